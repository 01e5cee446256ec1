"""Update stages: client-side encode, server-side decode, with explicit state."""
