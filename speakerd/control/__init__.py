"""The control socket: `server` (in `speakerd run`, against a Host), `client` (`speakerd
status`, `speakerd announce`, `speakerd check`), `stats` (what status counts)."""
