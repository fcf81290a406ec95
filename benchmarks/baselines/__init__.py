"""What a user would build instead: the obvious FastAPI service and LitServe, both running the same
checkpoint and the same smoothing (``models.Smooth``) as the service, for side-by-side measurement."""
