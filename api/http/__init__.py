"""The HTTP side: routes, their dependencies, the answers' schemas, errors and upload parsing."""
