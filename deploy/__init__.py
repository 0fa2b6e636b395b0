"""Fleet provisioning and model rollout with Ansible."""
