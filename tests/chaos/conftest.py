"""The chaos suite's fixtures and its report at the end of the run.

``pytest tests/chaos`` (marker ``chaos``) runs real brokers, daemons and collectors
and injects faults into them; the terminal summary then lists, per scenario, the
images placed, identifications stored, duplicates dropped, images lost, the faults
injected and the seed. The fault plans are drawn from one seed per session, printed
with the results; ``FIELDSCOPE_CHAOS_SEED=N`` replays a run's plan.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_SEED = pytest.StashKey[int]()
_REPORTS = pytest.StashKey[list[Any]]()
_CALL_PASSED = pytest.StashKey[bool]()


def pytest_plugin_registered(plugin: object, manager: pytest.PytestPluginManager) -> None:
    """Give ``import conftest`` back to tests/conftest.py once this file is loaded.

    pytest imports every conftest.py outside a package as the module ``conftest``, so
    loading this one replaces tests/conftest.py in ``sys.modules``, and the test
    modules collected after it (``from conftest import Broker``) would import this
    file instead. The top-level conftest stays registered as a plugin; only the module
    name is pointed back at it.
    """
    if plugin is sys.modules.get(__name__):
        top = manager.get_plugin(str(Path(__file__).resolve().parent.parent / "conftest.py"))
        if top is not None:
            sys.modules["conftest"] = top


def pytest_configure(config: pytest.Config) -> None:
    raw = os.environ.get("FIELDSCOPE_CHAOS_SEED", "").strip()
    if raw:
        try:
            seed = int(raw, 0)
        except ValueError:
            raise pytest.UsageError(
                f"FIELDSCOPE_CHAOS_SEED must be an integer, got {raw!r}"
            ) from None
    else:
        seed = random.SystemRandom().randrange(2**31)
    config.stash[_SEED] = seed
    config.stash[_REPORTS] = []


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    reports = config.stash.get(_REPORTS, [])
    if not reports:
        return
    seed = config.stash[_SEED]
    terminalreporter.section("chaos: what each scenario counted")
    terminalreporter.write_line(
        "stored = identification rows in the collector's store; duplicates dropped = "
        "identifications published again (after a kill or a reconnect) and dropped by "
        "(device, seq); lost = images never stored; fuzz tests: inputs by outcome"
    )
    for report in reports:
        terminalreporter.write_line(report.line())
    terminalreporter.write_line(
        f"replay these fault plans with FIELDSCOPE_CHAOS_SEED={seed} (a line with another "
        "seed is a regression seed the test always replays)"
    )


@pytest.fixture(scope="session")
def chaos_seed(pytestconfig: pytest.Config) -> int:
    return pytestconfig.stash[_SEED]


@pytest.fixture(scope="session")
def chaos_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """200 distinct synthetic specimen PNGs (8 species), generated once."""
    from fieldscope.edge.specimens import write_dataset

    root = tmp_path_factory.mktemp("chaos-specimens") / "dataset"
    write_dataset(root, classes=8, per_class=25, size=96)
    return sorted(root.rglob("*.png"))


@pytest.fixture(scope="session")
def chaos_tally(pytestconfig: pytest.Config) -> Callable[[str], Any]:
    """``chaos_tally(name)``: the :class:`chaos_harness.Tally` of that name (one per
    fuzz test), listed in the terminal summary."""
    from chaos_harness import Tally

    tallies: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in tallies:
            tallies[name] = Tally(name)
            pytestconfig.stash[_REPORTS].append(tallies[name])
        return tallies[name]

    return get


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember whether the test body passed, for its chaos report's verdict."""
    report = yield
    if report.when == "call":
        item.stash[_CALL_PASSED] = report.passed
    return report


@pytest.fixture
def chaos_report(
    pytestconfig: pytest.Config, chaos_seed: int, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """This scenario's report, listed in the terminal summary whatever the outcome. Its
    verdict is "ok" only when the harness's count passed *and* the whole test did: an
    assertion after ``Site.finish`` fails the scenario's line too."""
    from chaos_harness import Report

    # A test parametrized with ``regression_seed`` replays a plan that once failed, beside
    # the session's own; the scenario name (the rng's salt) stays the test's, unparametrized.
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    seed = params.get("regression_seed") or chaos_seed
    report = Report(scenario=request.node.originalname.removeprefix("test_"), seed=seed)
    pytestconfig.stash[_REPORTS].append(report)
    yield report
    report.passed = report.passed and request.node.stash.get(_CALL_PASSED, False)


@pytest.fixture
def make_site(tmp_path: Path, tiny_bundles: Any, chaos_report: Any) -> Iterator[Callable[..., Any]]:
    """Build the scenario's :class:`chaos_harness.Site`; everything it started is
    killed at teardown, pass or fail."""
    from chaos_harness import Site, scenario_rng

    sites: list[Any] = []

    def make(images: list[Path], **options: Any) -> Any:
        site = Site(
            tmp_path / "site",
            bundle=tiny_bundles.v1,
            images=images,
            report=chaos_report,
            rng=scenario_rng(chaos_report.seed, chaos_report.scenario),
            **options,
        )
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.close()
