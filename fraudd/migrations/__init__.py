"""fraudd's SQL migrations, ``NNN_name.sql``, shipped inside the package and applied by ``fraudd migrate``."""
