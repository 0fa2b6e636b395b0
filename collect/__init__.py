"""The subscriber side: collect identifications from the fleet, store, export, show."""
