"""agents package (grows with later work)."""
