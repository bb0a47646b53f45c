"""The store boundary: the only package that talks to Redis (DESIGN.md "The store boundary")."""
