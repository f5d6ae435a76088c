"""The node: pulls jobs from a queue server and runs them on local or remote models."""
