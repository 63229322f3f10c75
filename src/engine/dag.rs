//! Workflow definitions as directed acyclic graphs: validation of saved definitions and the
//! order steps become ready in.
