"""Policy worker: decides shutdowns from SQL over the readings and commands host agents."""
