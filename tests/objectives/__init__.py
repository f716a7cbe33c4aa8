"""Tests of jlora.objectives (a package, so that its conftest does not clash with tests/models' when both
directories are named on one pytest command line)."""
