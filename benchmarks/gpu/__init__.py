"""The one-call GPU check: see check.sh."""
