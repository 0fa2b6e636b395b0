"""Map the top-level source folders onto the ``fieldscope.*`` namespace.

The folders ``edge/``, ``train/``, ... stand at the repository root (docs/architecture.md#layout),
but must install as ``fieldscope.edge``, ``fieldscope.train``, ... and never as
generic top-level modules. Every subpackage is discovered here, because a
subpackage missing from ``packages`` works in an editable install yet silently
drops out of the wheel (tests/test_packaging.py guards that).
"""

from setuptools import find_packages, setup

FOLDERS = ("edge", "train", "convert", "deploy", "collect", "cli")

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder in FOLDERS:
    top = f"fieldscope.{folder}"
    packages.append(top)
    package_dir[top] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{top}.{sub}")
        package_dir[f"{top}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "fieldscope.cli": ["py.typed"],
        "fieldscope.edge": ["py.typed", "schemas/*.json", "examples/*.toml"],
        "fieldscope.deploy": ["**/*.yml", "**/*.j2", "**/*.service", "**/*.cfg", "**/*.ini"],
        "fieldscope.collect": ["py.typed", "templates/*", "static/*"],
        "fieldscope.train": ["examples/*.toml"],
    },
    include_package_data=False,
)
