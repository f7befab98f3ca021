"""The results model (one schema) and its renderings: JSON, Markdown, JUnit."""
