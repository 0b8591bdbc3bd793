"""The HTTP layer: dialect schemas, validation, auth, limits."""
