"""The DVC stages and commands: thin Typer programs that read params.yaml, call bestrq and
log with DVCLive."""
