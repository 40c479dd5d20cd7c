"""Small shared utilities (atomic IO, seeding, hashing)."""
