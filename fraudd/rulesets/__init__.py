"""Rule sets as versioned data: stored in PostgreSQL, published through Redis, tested on stored vectors."""
