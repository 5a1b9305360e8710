"""Online serving (HTTP API for /recommend, /score, /similar): built in a later milestone."""
