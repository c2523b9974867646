//! idpoller against the stack.
