"""`make demo`: a simulated outage through the whole pipeline on throwaway local servers."""
