"""After training: validation loss per task and codebook (evaluate), the routing report (routing_report) and
`unimoe generate` (generate_cli)."""
