"""The Lua side of the Redis session store: its scripts, and the hash fields they use.

Every read and write of a session is one of these scripts, so that a read sees a whole
record and a compare-and-set, its index updates and its accounting (TTL, LRU,
max-sessions) happen at once on the Redis side.
:class:`~gruserve.sessions.redis_store.RedisSessionStore` registers them and sends them
batches of sessions; the packed write they unpack is :mod:`._packing`'s, and the
packed record layout's own script parts are :mod:`._record`'s.
"""

from __future__ import annotations

from gruserve.sessions.redis_store._packing import HISTORY_FIELD, lua_hset_args, lua_unpack
from gruserve.sessions.redis_store._record import FIELD, LUA_MODEL, lua_cas, lua_read

NOW_MS = (
    "local t = redis.call('TIME') "
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
)

# KEYS[1] index (ids by idle deadline), KEYS[2] lifetimes (ids by lifetime deadline),
# KEYS[3] ids (every id, score 0: listed by ZRANGEBYLEX). A swept session's hash has already
# expired (its PEXPIREAT is the earlier deadline); the DEL keeps that true whatever happened.
FORGET = """
-- index entries of the writes of one call, added by one ZADD per set (flush) before
-- anything reads or removes index entries, and at the end of the call
local idle, lives, fresh = {}, {}, {}
local function zadd(key, pairs)
    for i = 1, #pairs, 400 do  -- bounded: unpack needs a stack slot per value
        redis.call('ZADD', key, unpack(pairs, i, math.min(i + 399, #pairs)))
    end
end
local function flush()
    if #idle > 0 then zadd(KEYS[1], idle) idle = {} end
    if #lives > 0 then zadd(KEYS[2], lives) lives = {} end
    if #fresh > 0 then zadd(KEYS[3], fresh) fresh = {} end
end
local function forget(ids, prefix)
    if #ids == 0 then return end
    flush()
    redis.call('ZREM', KEYS[1], unpack(ids))
    redis.call('ZREM', KEYS[2], unpack(ids))
    redis.call('ZREM', KEYS[3], unpack(ids))
    local keys = {}
    for i, id in ipairs(ids) do keys[i] = prefix .. id end
    redis.call('DEL', unpack(keys))
end
local function sweep(now, prefix)
    local lifetime = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
    forget(lifetime, prefix)
    local idle = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1000)
    forget(idle, prefix)
    return {idle, lifetime}
end
-- room for one more session: sweep while the index is full and sweeping finds expired ids,
-- then evict least recently used sessions (lru == '1') or answer false. ended and evicted
-- collect what went, for the caller to report.
local function make_room(max, lru, now, prefix, evicted, ended)
    flush()
    local sweeping = true
    while redis.call('ZCARD', KEYS[1]) >= max do
        local removed = 0
        if sweeping then
            local gone = sweep(now, prefix)
            for _, id in ipairs(gone[1]) do ended[1][#ended[1] + 1] = id end
            for _, id in ipairs(gone[2]) do ended[2][#ended[2] + 1] = id end
            removed = #gone[1] + #gone[2]
            sweeping = removed > 0
        end
        if removed == 0 then
            if lru ~= '1' then return false end
            local victim = redis.call('ZRANGE', KEYS[1], 0, 0)
            forget(victim, prefix)
            evicted[#evicted + 1] = victim[1]
        end
    end
    return true
end
local function expire(key, id, now, ttl, deadline)
    local idle_at = now + ttl
    local expire_at = idle_at
    if deadline > 0 then
        lives[#lives + 1] = deadline
        lives[#lives + 1] = id
        if deadline < expire_at then expire_at = deadline end
    end
    redis.call('PEXPIREAT', key, expire_at)
    idle[#idle + 1] = idle_at
    idle[#idle + 1] = id
end
"""

# KEYS[4..] the sessions' hashes, one per write. ARGV[1] ttl_ms, ARGV[2] max_sessions, ARGV[3]
# lru (1/0), ARGV[4] hash key prefix, ARGV[5] a random token of this call, then one packed
# write per key (gruserve.sessions.redis_store._packing: id, expected revision (-1: create if
# absent), lifetime deadline_ms (0: none), end (1: remove the session instead of storing
# it), base (the writer the hash must also hold; empty: any), and the record's fields).
# Answers {per write: 1 written (or already written by this
# writer: a retry after a lost reply), 0 lost the race, -1 gone, -2 no room to create;
# evicted, idle, lifetime ids}.
CAS = """
local ttl, out = tonumber(ARGV[1]), {}
local ended, evicted = {{}, {}}, {}
for i = 4, #KEYS do
    local key, w = KEYS[i], unpack_write(ARGV[i + 2])
    local writer = ARGV[5] .. ':' .. i  -- unique per write, and the same when it is retried
    local cur = redis.call('HMGET', key, 'revision', 'writer')
    if not cur[1] then
        if w.expected ~= '-1' then
            out[#out + 1] = -1
        elseif w['end'] == '1' then  -- created and ended at once: nothing to keep
            out[#out + 1] = 1
        elseif make_room(tonumber(ARGV[2]), ARGV[3], now, ARGV[4], evicted, ended) then
            redis.call('HSET', key, FIELDS, 'writer', writer)
            expire(key, w.id, now, ttl, tonumber(w.deadline))
            fresh[#fresh + 1] = 0
            fresh[#fresh + 1] = w.id
            out[#out + 1] = 1
        else
            out[#out + 1] = -2
        end
    elseif cur[1] ~= w.expected or (w.base ~= '' and cur[2] ~= w.base) then
        if cur[1] == w.revision and cur[2] == writer then
            out[#out + 1] = 1
        else
            out[#out + 1] = 0
        end
    elseif w['end'] == '1' then
        forget({w.id}, ARGV[4])
        out[#out + 1] = 1
    else
        redis.call('HSET', key, FIELDS, 'writer', writer)
        expire(key, w.id, now, ttl, tonumber(w.deadline))
        out[#out + 1] = 1
    end
end
flush()
return {out, evicted, ended[1], ended[2]}
"""

# KEYS: the sessions' hashes. Answers each one's FIELDS_IN_ORDER (all nil for a missing session).
READ = """
local out = {}
for i, key in ipairs(KEYS) do
    out[i] = redis.call('HMGET', key, READ_FIELDS)
end
return out
"""

# KEYS[4..] the sessions' hashes; ARGV[1] hash key prefix, ARGV[2..] their ids. Answers
# per session 1 (it existed) or 0.
DELETE = (
    FORGET
    + """
local existed, ids = {}, {}
for i = 4, #KEYS do
    existed[#existed + 1] = redis.call('EXISTS', KEYS[i])
    ids[#ids + 1] = ARGV[i - 2]
end
forget(ids, ARGV[1])
return existed
"""
)

COUNT = (
    FORGET
    + NOW_MS
    + """
local ended = sweep(now, ARGV[1])
return {redis.call('ZCARD', KEYS[1]), ended[1], ended[2]}
"""
)

# ARGV: cursor ('' = from the start), limit, ids to examine at most, model ('' = any), prefix.
# Answers a row per session: its id and listing fields, or its id and packed record.
PAGE = (
    FORGET
    + LUA_MODEL
    + NOW_MS
    + """
local ended = sweep(now, ARGV[5])
local low = '-'
if ARGV[1] ~= '' then low = '(' .. ARGV[1] end
local ids = redis.call('ZRANGEBYLEX', KEYS[3], low, '+', 'LIMIT', 0, tonumber(ARGV[3]))
local limit, found, last = tonumber(ARGV[2]), {}, ''
for _, id in ipairs(ids) do
    if #found >= limit then break end
    last = id
    local h = redis.call('HMGET', ARGV[5] .. id,
        'model', 'version', 'step', 'timesteps', 'created_at', 'last_used_at')
    if h[1] then
        if ARGV[4] == '' or h[1] == ARGV[4] then
            found[#found + 1] = {id, h[1], h[2], h[3], h[4], h[5], h[6]}
        end
    else  -- a packed record (gruserve.sessions.redis_store._record), or none
        local rec = redis.call('HGET', ARGV[5] .. id, 'record')
        if rec and (ARGV[4] == '' or packed_model(rec) == ARGV[4]) then
            found[#found + 1] = {id, rec}
        end
    end
end
local more = ''
if last ~= '' and #redis.call('ZRANGEBYLEX', KEYS[3], '(' .. last, '+', 'LIMIT', 0, 1) > 0 then
    more = last
end
return {more, found, ended[1], ended[2]}
"""
)

# KEYS[1..3] a bucket's sets, KEYS[4] a session hash (need not exist); ARGV[1] '1' when
# writes wait for replicas. Answers what the store sends or its scripts call that Redis's
# ACL denies the user running this, each as 'COMMAND key' (empty: all allowed). It reads and
# writes nothing: redis.acl_check_cmd (Redis 7.0 and later; on older Redis, {}) asks the ACL.
# A denial met in the middle of a script stops it there with what it wrote so far kept, so
# the store asks before it serves (RedisSessionStore.ping and cautions).
PERMISSIONS = """
if not redis.acl_check_cmd then return {} end
local denied = {}
local function check(...)
    if not redis.acl_check_cmd(...) then
        local call = {...}
        denied[#denied + 1] = call[1] .. (call[2] and (' ' .. call[2]) or '')
    end
end
local h = KEYS[4]
check('EVALSHA', '0', '1', h) check('SCRIPT', 'LOAD', 'return 0') check('PING') check('TIME')
check('HMGET', h, 'revision') check('HGET', h, 'record') check('HSET', h, 'revision', '0')
check('HDEL', h, 'state') check('EXISTS', h) check('PEXPIREAT', h, '0') check('DEL', h)
for i = 1, 3 do
    check('ZADD', KEYS[i], '0', 'id') check('ZREM', KEYS[i], 'id')
end
check('ZRANGEBYSCORE', KEYS[1], '-inf', '0') check('ZRANGEBYSCORE', KEYS[2], '-inf', '0')
check('ZCARD', KEYS[1]) check('ZRANGE', KEYS[1], '0', '0') check('ZRANGEBYLEX', KEYS[3], '-', '+')
if ARGV[1] == '1' then check('WAIT', '0', '0') end
return denied
"""
PROBE_ID = "gruserve-permission-check"
"""The session id whose hash key :data:`PERMISSIONS` is asked about (nothing touches it)."""


FIELDS_IN_ORDER = (
    "model",
    "version",
    "state",
    "step",
    "timesteps",
    "revision",
    "created_at",
    "last_used_at",
    "result",
    "owner",
)
"""A session hash's fields in the order ``READ`` answers them (the write script also
stores ``writer``; :mod:`._packing` says how a write sends them)."""
READ_FIELDS = (*FIELDS_IN_ORDER, FIELD)
"""What a read asks for: the fields, and ``record`` in case the hash holds a packed record
(:mod:`._record`) written by a replica with packed records on."""
HISTORY_FIELDS = (*READ_FIELDS, HISTORY_FIELD)
"""The fields with ``GRUSERVE_SESSION_HISTORY`` on (:data:`._packing.HISTORY_FIELD`)."""


def scripts(history: bool, packed: bool = False) -> tuple[str, str]:
    """The compare-and-set and read scripts of hashes without or with ``history``, writing
    field by field or ``packed`` (both read either layout)."""
    fields = HISTORY_FIELDS if history else READ_FIELDS
    if packed:
        return FORGET + NOW_MS + lua_cas(history), lua_read(fields, history)
    cas = FORGET + lua_unpack(history) + NOW_MS + CAS.replace("FIELDS", lua_hset_args(history))
    return cas, READ.replace("READ_FIELDS", ", ".join(f"'{name}'" for name in fields))


WRITE_SCRIPT = scripts(history=False, packed=True)[0]
"""The compare-and-set script of a server with the default settings (packed records, no
history): its SHA1 marks a step's write on the wire (fault tests)."""
