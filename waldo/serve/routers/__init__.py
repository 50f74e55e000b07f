"""The service's endpoints, one router per area: search, images (the collection), meta."""
