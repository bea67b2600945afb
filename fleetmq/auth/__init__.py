"""Access control as pure decisions: tokens and who may do what (contract section 8).

Nothing here reads a store, a socket or a clock; the edges (HTTP middleware, broker plugins,
the dynamic-security client) look up a principal and ask these modules for a verdict.
"""
