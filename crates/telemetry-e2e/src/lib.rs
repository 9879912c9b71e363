//! Only tests live here (`tests/`): they start every service in this process with
//! `mailsuite_testkit::TestSuite` and check what an operator relies on — one trace per
//! message across services, and metrics that move with the mail.
