"""Makes ``twistd mqmq`` run the mqmq server (see :mod:`mqmq.tap`)."""

from twisted.application.service import ServiceMaker

mqmq = ServiceMaker(
    "mqmq",
    "mqmq.tap",
    "A message-queue server speaking the mqmq wire protocol.",
    "mqmq",
)
