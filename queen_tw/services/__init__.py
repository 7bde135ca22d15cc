"""Background services of the server: retention, eviction and statistics (TimerService-style
children of the server's MultiService)."""
