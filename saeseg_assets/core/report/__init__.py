"""What the study says: typed results, tables, pictures, text and the HTML report."""
