"""Fleet provisioning and safe model rollout, done by Ansible.

The playbooks in ``ansible/`` (shipped as package data) provision Raspberry Pis
(``provision.yml``), roll a verified bundle out canary-first with automatic
rollback (``rollout.yml``), go back one bundle (``rollback.yml``) and report what
every device runs (``status.yml``). :mod:`fieldscope.deploy.cli` adds
``fieldscope deploy`` as a thin wrapper around ``ansible-playbook``; the operator
workflow is in ``docs/deploy.md``. The unit file the playbooks install is
``systemd/fieldscope-edge.service``.
"""
