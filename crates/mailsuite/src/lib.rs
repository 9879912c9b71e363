//! The whole system in one process: the wiring behind `mailsuite up`, also used by the test
//! kit's `TestSuite` to start everything on ephemeral ports.

pub mod up;
