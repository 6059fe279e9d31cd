"""Extensions that tests register, to show that adding one takes one file and one registration."""
