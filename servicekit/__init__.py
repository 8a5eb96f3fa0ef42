"""What every service of the stack shares: settings, database access, logging."""
