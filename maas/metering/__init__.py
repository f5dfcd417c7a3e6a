"""Usage metering: one record per request, written in batches off the request path."""
