"""The gallery nodes: IAFIS (criminal history) and IDENT (immigration), on one shared gallery server."""
