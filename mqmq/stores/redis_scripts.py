"""The Lua scripts the Redis store runs: each changes one queue (or the lease index) atomically.

A queue's keys share one hash tag, so a script touches one Redis Cluster
slot.  Redis runs one script at a time, so a message taken by one script is
seen by no other: that is how servers share a queue without handing a
message to two consumers.

Keys of a queue (``P`` is the prefix and tag, ``mqmq:{q:NAME}:``):

- ``P ready``  list of ids ready to hand out, oldest at the left;
- ``P body``   hash id -> message; ``P dlv`` hash id -> times handed out;
- ``P resv``   sorted set of reserved ids by deadline (ms, Redis's clock);
- ``P own``    hash reserved id -> the server that holds it;
- ``P buried`` list of buried ids, oldest first;
- ``P meta``   hash: ``seq`` (the last id given), ``bytes`` (of ready
  messages), ``bbytes`` (of buried ones);
- ``P sleep``  set of servers that found ``ready`` empty while they had
  waiters: a script that makes a message ready publishes on ``P wake``;
- ``P taken:SERVER``  hash take-number -> what that take handed out, kept
  until the server confirms it got the reply (so a reply lost with its
  connection is put back, not lost); expires a minute after its last take.
"""

from __future__ import annotations

#: The one script every batch runs on a queue: its operations in order.
#:
#: KEYS: ready body dlv resv own buried meta sleep taken
#: ARGV: server, wake channel, max deliveries (0 = none), grace ms, the
#: queue's number if it may have none yet (else ""), then operations, each
#: an opcode and its arguments:
#:
#: - ``P body``           put at the back (a new id)
#: - ``F id dlv body``    put at the front (id "" = a new one), deliveries kept
#: - ``A id``             ack: a reserved message this server holds is gone
#: - ``R id``             release it to the front
#: - ``G id``             give it back to the front unhanded (deliveries - 1)
#: - ``B id``             bury it
#: - ``L id ms``          its deadline is now + ms (+ grace)
#: - ``N id dlv body ms`` hold as reserved by this server (id "" = new)
#: - ``K n``              kick up to n buried messages to the back
#: - ``T take n k1..kn``  take for n waiters in order: k = -1 for a Get (the
#:                        message is removed), else a Reserve's lease in ms;
#:                        recorded as take number ``take``
#: - ``X take``           forget take number ``take`` (its reply arrived)
#: - ``Y take``           put back what take number ``take`` handed out (its
#:                        reply was lost)
#:
#: Ids: the queue's number (given once, from ``NUMBERS``), then its count in
#: ten digits.
#:
#: Returns ``{ready, bytes, buried, bbytes, ids, taken...}``: the queue's
#: counts once done, the ids given to ``P`` and ``N`` (in order), then for
#: each message taken ``id, deliveries, body, lease`` (lease -1: a Get's).
APPLY = r"""
local ready, body, dlv, resv, own, buried, meta, sleep, taken =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local server, channel = ARGV[1], ARGV[2]
local max_dlv, grace = tonumber(ARGV[3]), tonumber(ARGV[4])
-- Redis's clock, read only if a deadline is set (TIME costs a third of a take).
local now_ms
local function now()
    if not now_ms then
        local t = redis.call('TIME')
        now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    return now_ms
end
local became_ready = false
local ids, out = {}, {}

local function mine(id)
    return redis.call('HGET', own, id) == server
end
local function unreserve(id)
    redis.call('HDEL', own, id)
    redis.call('ZREM', resv, id)
end
local function size(id)
    return redis.call('HSTRLEN', body, id)
end
local number = redis.call('HGET', meta, 'qn')
if not number and ARGV[5] ~= '' then
    number = ARGV[5]
    redis.call('HSET', meta, 'qn', number)
end
local function new_id()
    -- The queue's number, then its own count in ten digits: unique among
    -- every queue's messages, and in the order they were made.
    if not number then error('mqmq: the queue has no number yet') end
    return number .. string.format('%010d', redis.call('HINCRBY', meta, 'seq', 1))
end
local function to_front(id)
    redis.call('LPUSH', ready, id)
    redis.call('HINCRBY', meta, 'bytes', size(id))
    became_ready = true
end
local function hold(id, lease)
    redis.call('ZADD', resv, now() + lease + grace, id)
    redis.call('HSET', own, id, server)
end

-- (Sizes are subtracted as 0 - n: Lua's -0 reaches Redis as "-0", not an integer.)
local i = 6
while i <= #ARGV do
    local op = ARGV[i]
    if op == 'P' then
        local id = new_id()
        redis.call('HSET', body, id, ARGV[i + 1])
        redis.call('RPUSH', ready, id)
        redis.call('HINCRBY', meta, 'bytes', #ARGV[i + 1])
        became_ready = true
        ids[#ids + 1] = id
        i = i + 2
    elseif op == 'F' then
        local id = ARGV[i + 1]
        if id == '' then id = new_id() end
        if redis.call('HSETNX', body, id, ARGV[i + 3]) == 1 then
            if tonumber(ARGV[i + 2]) > 0 then redis.call('HSET', dlv, id, ARGV[i + 2]) end
            to_front(id)
        end
        i = i + 4
    elseif op == 'A' then
        local id = ARGV[i + 1]
        if mine(id) then
            unreserve(id)
            redis.call('HDEL', body, id)
            redis.call('HDEL', dlv, id)
        end
        i = i + 2
    elseif op == 'R' then
        local id = ARGV[i + 1]
        if mine(id) then
            unreserve(id)
            to_front(id)
        end
        i = i + 2
    elseif op == 'G' then
        local id = ARGV[i + 1]
        if mine(id) then
            unreserve(id)
            redis.call('HINCRBY', dlv, id, -1)
            to_front(id)
        end
        i = i + 2
    elseif op == 'B' then
        local id = ARGV[i + 1]
        if mine(id) then
            unreserve(id)
            redis.call('RPUSH', buried, id)
            redis.call('HINCRBY', meta, 'bbytes', size(id))
        end
        i = i + 2
    elseif op == 'L' then
        local id = ARGV[i + 1]
        if mine(id) then
            redis.call('ZADD', resv, now() + tonumber(ARGV[i + 2]) + grace, id)
        end
        i = i + 3
    elseif op == 'N' then
        local id = ARGV[i + 1]
        if id == '' then id = new_id() end
        if redis.call('HSETNX', body, id, ARGV[i + 3]) == 1 then
            redis.call('HSET', dlv, id, ARGV[i + 2])
            hold(id, tonumber(ARGV[i + 4]))
        end
        ids[#ids + 1] = id
        i = i + 5
    elseif op == 'K' then
        for _ = 1, tonumber(ARGV[i + 1]) do
            local id = redis.call('LPOP', buried)
            if not id then break end
            local n = size(id)
            redis.call('HINCRBY', meta, 'bbytes', 0 - n)
            redis.call('HDEL', dlv, id)
            redis.call('RPUSH', ready, id)
            redis.call('HINCRBY', meta, 'bytes', n)
            became_ready = true
        end
        i = i + 2
    elseif op == 'T' then
        local take, n = ARGV[i + 1], tonumber(ARGV[i + 2])
        local record = {}
        for k = 1, n do
            local lease = tonumber(ARGV[i + 2 + k])
            local id, times
            while true do
                id = redis.call('LPOP', ready)
                if not id then break end
                times = tonumber(redis.call('HGET', dlv, id) or '0')
                if max_dlv == 0 or times < max_dlv then break end
                -- Handed out as many times as allowed: buried, not handed out.
                local s = size(id)
                redis.call('HINCRBY', meta, 'bytes', 0 - s)
                redis.call('RPUSH', buried, id)
                redis.call('HINCRBY', meta, 'bbytes', s)
            end
            if not id then
                redis.call('SADD', sleep, server)
                break
            end
            local message = redis.call('HGET', body, id)
            redis.call('HINCRBY', meta, 'bytes', 0 - #message)
            if lease < 0 then
                redis.call('HDEL', body, id)
                if times > 0 then redis.call('HDEL', dlv, id) end
            else
                redis.call('HSET', dlv, id, times + 1)
                hold(id, lease)
            end
            times = times + 1
            out[#out + 1] = id
            out[#out + 1] = times
            out[#out + 1] = message
            out[#out + 1] = lease
            record[#record + 1] = id
            record[#record + 1] = times
            record[#record + 1] = message
            record[#record + 1] = lease
        end
        if #record > 0 then
            redis.call('HSET', taken, take, cmsgpack.pack(record))
            redis.call('PEXPIRE', taken, 60000)
        end
        i = i + 3 + n
    elseif op == 'X' then
        redis.call('HDEL', taken, ARGV[i + 1])
        i = i + 2
    elseif op == 'Y' then
        local packed = redis.call('HGET', taken, ARGV[i + 1])
        if packed then
            redis.call('HDEL', taken, ARGV[i + 1])
            local record = cmsgpack.unpack(packed)
            for k = #record - 3, 1, -4 do
                local id, times, message, lease = record[k], record[k + 1], record[k + 2], record[k + 3]
                if tonumber(lease) < 0 then
                    if redis.call('HSETNX', body, id, message) == 1 then
                        if tonumber(times) > 1 then redis.call('HSET', dlv, id, tonumber(times) - 1) end
                        to_front(id)
                    end
                elseif mine(id) then
                    unreserve(id)
                    redis.call('HINCRBY', dlv, id, -1)
                    to_front(id)
                end
            end
        end
        i = i + 2
    else
        return redis.error_reply('ERR mqmq: unknown operation ' .. tostring(op))
    end
end

local count = redis.call('LLEN', ready)
if became_ready and count > 0 and redis.call('EXISTS', sleep) == 1 then
    redis.call('DEL', sleep)
    redis.call('SPUBLISH', channel, '')
end
local m = redis.call('HMGET', meta, 'bytes', 'bbytes')
local result = {count, tonumber(m[1] or '0'), redis.call('LLEN', buried), tonumber(m[2] or '0'), ids}
for k = 1, #out do result[#result + 1] = out[k] end
return result
"""

#: Reservations whose deadlines have passed (their server died, or a
#: delayed release's time came) go back to the front, oldest first.
#:
#: KEYS: ready body dlv resv own meta sleep; ARGV: wake channel, most.
#: Returns ``{how many came back, the next deadline or -1, Redis's now}``.
RECLAIM = r"""
local ready, body, dlv, resv, own, meta, sleep = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', resv, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
-- Oldest first: ids are digits, so the shorter or, as long, the lower.
table.sort(due, function(a, b) return #a < #b or #a == #b and a < b end)
for k = #due, 1, -1 do
    local id = due[k]
    redis.call('ZREM', resv, id)
    redis.call('HDEL', own, id)
    redis.call('LPUSH', ready, id)
    redis.call('HINCRBY', meta, 'bytes', redis.call('HSTRLEN', body, id))
end
if #due > 0 and redis.call('EXISTS', sleep) == 1 then
    redis.call('DEL', sleep)
    redis.call('SPUBLISH', ARGV[1], '')
end
local first = redis.call('ZRANGE', resv, 0, 0, 'WITHSCORES')
local next_deadline = -1
if #first > 0 then next_deadline = tonumber(first[2]) end
return {#due, next_deadline, now}
"""

#: The lease index: which queues may hold reservations, by their earliest
#: deadline.  A server records a queue here before it reserves on it, so a
#: server killed with reservations leaves an entry the others sweep.
#:
#: KEYS: leases version; ARGV: queue name, lease ms (+ grace).
INDEX_TOUCH = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'LT', now + tonumber(ARGV[2]), ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
return 1
"""

#: Index entries due: ``{name, version, ...}``.  KEYS: leases version; ARGV: most.
INDEX_DUE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, name in ipairs(names) do
    out[#out + 1] = name
    out[#out + 1] = redis.call('HGET', KEYS[2], name) or '0'
end
return out
"""

#: After a sweep of one queue: its entry moves to its next deadline (at the
#: latest ``linger`` ms from now), or, found without reservations twice in a
#: row with nobody recording it between, goes.  Unchanged if a server
#: recorded the queue since the sweep read it (it may be reserving now).
#:
#: KEYS: leases version empty; ARGV: name, version seen, next deadline or -1, linger ms.
INDEX_SETTLE = r"""
local name, seen = ARGV[1], ARGV[2]
local next_deadline, linger = tonumber(ARGV[3]), tonumber(ARGV[4])
if (redis.call('HGET', KEYS[2], name) or '0') ~= seen then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if next_deadline >= 0 then
    redis.call('HDEL', KEYS[3], name)
    redis.call('ZADD', KEYS[1], math.min(next_deadline, now + linger), name)
    return 1
end
if redis.call('HGET', KEYS[3], name) == seen then
    redis.call('ZREM', KEYS[1], name)
    redis.call('HDEL', KEYS[2], name)
    redis.call('HDEL', KEYS[3], name)
    return 2
end
redis.call('HSET', KEYS[3], name, seen)
redis.call('ZADD', KEYS[1], now + linger, name)
return 3
"""

#: A queue's counts, for a queue this server holds no fresh figures of.
#: KEYS: ready buried meta.  Returns ``{ready, bytes, buried, bbytes}``.
COUNTS = r"""
local m = redis.call('HMGET', KEYS[3], 'bytes', 'bbytes')
return {redis.call('LLEN', KEYS[1]), tonumber(m[1] or '0'), redis.call('LLEN', KEYS[2]), tonumber(m[2] or '0')}
"""
