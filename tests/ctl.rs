//! imapctl commands against the stack.
