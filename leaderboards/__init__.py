"""leaderboards package (grows with later work)."""
