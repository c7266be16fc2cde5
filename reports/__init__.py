"""Result model (report.json) and its renderings: JUnit, HTML, Markdown, the matrix."""
