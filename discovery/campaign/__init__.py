"""Campaigns: a scenario run on a real deployment (the testbed, or hosts an inventory lists), from bring-up to
teardown, with its results folder (raw JSON, plots, a summary). See `discovery.campaign.runner`."""
