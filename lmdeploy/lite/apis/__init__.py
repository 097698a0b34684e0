"""Command-line tools of lmdeploy.lite (`python -m lmdeploy.lite.apis.<tool>`)."""
