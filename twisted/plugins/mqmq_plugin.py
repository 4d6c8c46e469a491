"""Makes ``twistd mqmq`` run the mqmq server (see :mod:`mqmq.server.tap`)."""

from twisted.application.service import ServiceMaker

mqmq = ServiceMaker(
    "mqmq",
    "mqmq.server.tap",
    "A message-queue server speaking the mqmq wire protocol.",
    "mqmq",
)
