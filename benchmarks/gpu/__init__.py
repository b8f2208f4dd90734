"""GPU-session scripts (run.sh and its Python helpers)."""
