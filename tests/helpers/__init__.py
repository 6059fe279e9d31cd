"""Helpers shared by the tests: model builders, hub and webhook servers, projects, hand computations."""
