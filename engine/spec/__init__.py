"""What speculation proposes: Medusa heads, trees, the proposer and its top-k."""
