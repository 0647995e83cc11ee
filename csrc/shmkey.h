/*
 * shmkey.h - the one description of the shmkey wire and ring layout.
 *
 * Read twice: by the C compiler (each .c file includes <stdint.h> first) and
 * by the cffi build as its cdef, so Python, C and the ring never disagree.
 * That is why this file has no #include, no include guard and no macros
 * other than integer constants: cffi's parser accepts nothing else.
 */

/* ---- versioning ------------------------------------------------------ */
#define SHMKEY_MAGIC 0x59454b53          /* "SKEY" little-endian */
#define SHMKEY_VERSION 2                 /* of the handshake and the ring */

/* ---- status codes: 0 is success, every failure is negative ----------- */
#define SHMKEY_OK 0
#define SHMKEY_EINVAL -1        /* bad argument, caught before or at the oracle */
#define SHMKEY_ETIMEDOUT -2     /* deadline passed; the request was withdrawn */
#define SHMKEY_EUNAVAIL -3      /* the oracle is gone or shutting down */
#define SHMKEY_EPOLICY -4       /* the oracle's policy refuses this operation */
#define SHMKEY_EPROTO -5        /* malformed request, reply or handshake */
#define SHMKEY_ETOOBIG -6       /* input larger than a slot or message allows */
#define SHMKEY_EDECRYPT -7      /* decryption failed (one error for every cause) */
#define SHMKEY_EUNSUPPORTED -8  /* unknown operation, padding or hash */
#define SHMKEY_ESYSTEM -9       /* an OS call failed (see errno at the caller) */
#define SHMKEY_ENOKEY -10       /* no key with that index */
#define SHMKEY_EINTERNAL -11    /* the crypto library failed */
#define SHMKEY_EACCESS -12      /* permission denied on the socket, or the oracle refused us */
#define SHMKEY_ETOKEN -13       /* the key's PKCS#11 token failed or is absent; the oracle re-opens it */
#define SHMKEY_EIDENTITY -14    /* the oracle runs as a user the client does not trust */
#define SHMKEY_ERATELIMIT -15   /* this connection asked faster than the oracle's --rate-limit */
#define SHMKEY_EPENDING -16     /* shmkey_collect: no reply yet; wait for the ticket's fd */
#define SHMKEY_EBUSY -17        /* shmkey_submit: every slot of this process is in use */

/* ---- operations and their parameters ---------------------------------- */
#define SHMKEY_OP_PING 1        /* echo the payload; answered by the C worker loop */
#define SHMKEY_OP_PUBKEY 2      /* reply: SubjectPublicKeyInfo DER of key_id */
#define SHMKEY_OP_SIGN 3        /* p[0]=scheme p[1]=hash p[2]=mgf1 hash p[3]=salt len;
                                   in = digest (Ed25519: the message itself) */
#define SHMKEY_OP_DECRYPT 4     /* p[0]=padding p[1]=hash p[2]=mgf1 hash p[3]=label len; in = ct || label */
#define SHMKEY_OP_KEYS 5        /* reply: the keys, each a u16 little-endian length and an SPKI DER */
#define SHMKEY_OP_STATUS 6      /* p[0]=byte offset; reply: that part of the oracle's status JSON,
                                   slot_size bytes unless it is the last part */

/* Signature schemes (p[0] of a sign) and RSA decryption paddings. */
#define SHMKEY_PAD_PKCS1V15 1
#define SHMKEY_PAD_PSS 2
#define SHMKEY_PAD_OAEP 3
#define SHMKEY_SIG_ECDSA 4      /* DER-encoded ECDSA signature over the digest */
#define SHMKEY_SIG_ED25519 5    /* pure Ed25519 over the message; p[1..3] zero */

#define SHMKEY_HASH_NONE 0
#define SHMKEY_HASH_SHA1 1
#define SHMKEY_HASH_SHA256 2
#define SHMKEY_HASH_SHA384 3
#define SHMKEY_HASH_SHA512 4

/* ---- transports -------------------------------------------------------- */
#define SHMKEY_TRANSPORT_ANY 0          /* the oracle's choice (its ring, unless told otherwise) */
#define SHMKEY_TRANSPORT_SHM 1          /* a ring of this connection's own */
#define SHMKEY_TRANSPORT_SOCKET 2       /* length-prefixed messages on the connection */

/* ---- slot states (low 32 bits of shmkey_slot.ctl) ---------------------- */
#define SHMKEY_SLOT_FREE 0        /* the client's to fill */
#define SHMKEY_SLOT_SUBMITTED 2   /* waiting for a worker */
#define SHMKEY_SLOT_BUSY 3        /* a worker copied the request and works on it */
#define SHMKEY_SLOT_WRITING 4     /* a worker is writing the reply */
#define SHMKEY_SLOT_DONE 5        /* reply ready for the client */
#define SHMKEY_SLOT_ABANDONED 6   /* client gave up while BUSY; worker frees it */

/* Limits that both sides enforce. */
#define SHMKEY_MIN_SLOT_SIZE 256
#define SHMKEY_MAX_SLOT_SIZE 65536
#define SHMKEY_MAX_SLOTS 1024
#define SHMKEY_MAX_SOCKET_CONNS 256     /* a client's pool of socket connections */
#define SHMKEY_MAX_CONNS 1024           /* connections one oracle process serves at once */
#define SHMKEY_MAX_PROCS 64             /* worker processes of one oracle */
#define SHMKEY_HANDSHAKE_MS 1000        /* a hello, or a whole socket message, must arrive within this */

/* Who the client accepts as the oracle (shmkey_client_open's oracle_uid). */
#define SHMKEY_UID_DEFAULT -1           /* the caller's own uid or root */
#define SHMKEY_UID_ANY -2               /* anyone (version 1 key references) */

/* What a client asks: fixed-size, copied out of the ring in one go. */
struct shmkey_req {
    uint32_t op;
    uint32_t p[4];          /* operation parameters, see SHMKEY_OP_* */
    uint32_t in_len;        /* bytes of payload that are input */
    uint8_t key_id[32];     /* SHA-256 of the key's SPKI DER; all zero: the first key */
};

/* What the oracle answers. On error the payload may hold a short UTF-8 reason. */
struct shmkey_resp {
    int32_t status;
    uint32_t out_len;
};

/*
 * The first bytes a client sends on a new connection, after the oracle has
 * checked its SO_PEERCRED and before anything else crosses.
 */
struct shmkey_hello {
    uint32_t magic;         /* SHMKEY_MAGIC */
    uint32_t version;       /* SHMKEY_VERSION */
    uint32_t transport;     /* SHMKEY_TRANSPORT_* this connection is for */
    uint32_t reserved;      /* zero */
};

/*
 * The oracle's answer, one message. For a ring it carries SCM_RIGHTS
 * descriptors: the ring (a memfd sealed against shrinking, growing and
 * further seals), the status page (sealed against writing too), then one
 * pipe per slot whose read end says "your reply is ready". Geometry and
 * identity come from here and SO_PEERCRED, never from the shared pages.
 */
struct shmkey_welcome {
    uint32_t magic;
    uint32_t version;
    int32_t status;         /* SHMKEY_OK, or why the oracle refuses this connection */
    uint32_t transport;     /* what the connection carries now */
    uint32_t nslots;        /* ring slots (0 for the socket transport) */
    uint32_t slot_size;     /* payload bytes per slot, or per socket message */
    uint32_t oracle_pid;
    uint32_t spin_us;       /* how long either side spins before sleeping */
    uint32_t ncpu;
    uint32_t proc;          /* which worker process serves this connection */
    uint32_t nprocs;
    uint32_t nfds;          /* descriptors attached */
};

/*
 * The oracle's status page: one for all its clients, mapped read-only by
 * them (sealed against writing, so no client can forge it). Hints that steer
 * spinning; per worker process, so that a respawned one starts from zero.
 */
struct shmkey_status {
    uint32_t active[SHMKEY_MAX_PROCS];      /* threads spinning or computing */
    uint32_t spinners[SHMKEY_MAX_PROCS];    /* threads spinning or about to look for requests:
                                               no need to ring */
};

/*
 * One slot of a client's ring. ctl packs (generation << 32) | state so that
 * every transition is a single compare-and-swap that also checks the
 * generation: a worker that finishes late can never write into a slot that
 * was freed and reused. The payload (slot_size bytes) follows, 64-byte aligned.
 * Slot i is at i * stride, stride = 64-aligned (sizeof + slot_size).
 */
struct shmkey_slot {
    uint64_t ctl;
    uint32_t waiters;       /* nonzero: the client sleeps on its pipe, wake it */
    uint32_t reserved0;
    struct shmkey_req req;
    struct shmkey_resp resp;
    uint32_t reserved[2];
};

/* A worker's private copy of one request; filled by shmkey_server_next. */
struct shmkey_work {
    struct shmkey_req req;
    uint8_t *payload;       /* private buffer, cap bytes */
    uint32_t cap;
    uint32_t slot;          /* ring: which slot */
    uint64_t gen;           /* ring: generation the request was read at */
    void *conn;             /* the connection the request came on */
    uint32_t cursor;        /* where this worker starts its next scan */
    uint32_t qs;            /* this worker's index in the oracle's grace-period table, plus one */
    uint32_t active;        /* nonzero while counted in the status page's "active" */
    uint32_t looking;       /* nonzero while counted in its "spinners" */
    uint64_t conn_serial;   /* the connection's number, unique within the oracle */
    int32_t peer_pid;       /* the client, from SO_PEERCRED when it connected */
    uint32_t peer_uid;
};

/* A client connection that came or went, as the oracle's audit reads them. */
#define SHMKEY_CONN_OPENED 1
#define SHMKEY_CONN_CLOSED 2
#define SHMKEY_MAX_EVENTS 4096          /* queued per worker process; more are counted, not kept */
struct shmkey_conn_event {
    uint64_t serial;
    int32_t pid;
    uint32_t uid;
    uint32_t kind;          /* SHMKEY_CONN_* */
    uint32_t transport;     /* SHMKEY_TRANSPORT_SHM or _SOCKET */
    char comm[16];          /* the client's process name when it connected (/proc/PID/comm) */
};

/*
 * A request in flight (shmkey_submit): the connection, slot and generation
 * it holds, so that it can only ever be matched with its own reply. The
 * caller owns it until shmkey_collect returns anything but SHMKEY_EPENDING,
 * or until shmkey_abandon; fd stays open that long.
 */
struct shmkey_ticket {
    void *ring;             /* the connection it was sent on (referenced); NULL: none */
    uint32_t slot;
    uint32_t gen;
    uint64_t deadline_ns;   /* CLOCK_MONOTONIC */
    int fd;                 /* readable once the reply is ready or the oracle is gone */
    int reserved;
};

struct shmkey_client;
struct shmkey_server;

/* ---- client side: thread-safe, blocking calls release no locks held by Python ---- */
int shmkey_client_open(const char *path, int ctl_fd, int transport, int64_t oracle_uid,
                       int exact_uid, uint32_t timeout_ms, char *why, uint32_t whylen,
                       struct shmkey_client **out);
void shmkey_client_close(struct shmkey_client *c);
uint32_t shmkey_client_max_payload(const struct shmkey_client *c);
int shmkey_client_transport(const struct shmkey_client *c);
int shmkey_client_free_slots(struct shmkey_client *c);
int64_t shmkey_client_oracle_uid(const struct shmkey_client *c);
int64_t shmkey_client_oracle_pid(const struct shmkey_client *c);
int shmkey_client_why(struct shmkey_client *c, char *out, uint32_t cap);
int shmkey_call(struct shmkey_client *c, const struct shmkey_req *req,
                const uint8_t *in, uint8_t *out, uint32_t out_cap,
                struct shmkey_resp *resp, uint32_t timeout_ms);
int shmkey_ping_loop(struct shmkey_client *c, uint32_t n, uint64_t *ns_out,
                     uint32_t timeout_ms);
/* Non-blocking calls (ring transport): submit, wait for t->fd yourself, collect. */
int shmkey_submit(struct shmkey_client *c, const struct shmkey_req *req, const uint8_t *in,
                  uint32_t timeout_ms, struct shmkey_ticket *t);
int shmkey_collect(struct shmkey_ticket *t, uint8_t *out, uint32_t out_cap,
                   struct shmkey_resp *resp);
void shmkey_abandon(struct shmkey_ticket *t);
int shmkey_client_slots(const struct shmkey_client *c);

/* ---- oracle side ----------------------------------------------------- */
int shmkey_server_open(int fd, int listening, int transport, uint32_t nslots,
                       uint32_t slot_size, uint32_t spin_us, uint32_t nprocs,
                       struct shmkey_server **out);
int shmkey_server_next(struct shmkey_server *s, struct shmkey_work *w,
                       uint32_t timeout_ms);
int shmkey_server_reply(struct shmkey_server *s, struct shmkey_work *w,
                        int32_t status, const uint8_t *out, uint32_t out_len);
int shmkey_server_reap(struct shmkey_server *s);
int shmkey_server_allow_peers(struct shmkey_server *s, uint32_t uid, int64_t gid);
int shmkey_server_after_fork(struct shmkey_server *s, uint32_t proc);
int shmkey_server_connections(struct shmkey_server *s);
int shmkey_server_events(struct shmkey_server *s, struct shmkey_conn_event *out, uint32_t cap,
                         uint64_t *dropped);
void shmkey_server_stop(struct shmkey_server *s);
void shmkey_server_close(struct shmkey_server *s);
struct shmkey_work *shmkey_work_new(uint32_t cap);
void shmkey_work_free(struct shmkey_work *w);

/*
 * ---- the oracle's counters (stats.c writes them, oracle/stats.py reads) ---
 * A key's row of 64-bit words: counts by outcome, the latency sum, then a
 * histogram whose bucket i holds latencies up to shmkey_stats_bound_ns(i)
 * (an eighth of an octave wide; the last bucket has no bound). A client
 * connection's row counts its requests in the words below.
 */
#define SHMKEY_STAT_SIGNS 0
#define SHMKEY_STAT_DECRYPTS 1
#define SHMKEY_STAT_REFUSED_POLICY 2
#define SHMKEY_STAT_REFUSED_RATE 3
#define SHMKEY_STAT_ERRORS 4
#define SHMKEY_STAT_SIGNS_IN_C 5       /* of the signs, those made in C (signer.c) */
#define SHMKEY_STAT_LATENCY_SUM_NS 6
#define SHMKEY_STAT_HIST 7
#define SHMKEY_STAT_BOUNDS 176          /* 22 octaves from 1 us */
#define SHMKEY_CSTAT_OPS 5              /* signs and decryptions */
#define SHMKEY_CSTAT_REFUSED 6
#define SHMKEY_CSTAT_ERRORS 7
#define SHMKEY_CSTAT_LIMITED 8
uint64_t shmkey_stats_bound_ns(uint32_t i);
void shmkey_stats_record(uint64_t *key_row, uint64_t *client_row, uint32_t outcome,
                         uint64_t elapsed_ns);

/*
 * ---- signing without Python (signer.c, signer_token.c; the oracle only) --
 * The common signatures (RSA PKCS#1 v1.5 and PSS with MGF1 of the same hash
 * and a digest-long salt, ECDSA, Ed25519; SHA-256/384/512) of file keys,
 * and of token keys given a session, are made by the worker that took the
 * request, in C, with the GIL free. Anything else (other parameters,
 * rate-limited keys, a connection the counters do not know yet, any error
 * of the token) goes to Python as before, which stays the one judge of
 * what is refused and why.
 */
struct shmkey_signer;
struct shmkey_signer *shmkey_signer_new(void);
/* der (PKCS#8) is wiped; key_row: the key's counters in this process. */
int shmkey_signer_add(struct shmkey_signer *g, const uint8_t *key_id, uint8_t *der,
                      uint32_t der_len, int is_default, uint64_t *key_row);
/* Types of token keys; sig_len: the length of the token's raw signatures. */
#define SHMKEY_KEY_RSA 1
#define SHMKEY_KEY_EC 2
#define SHMKEY_KEY_ED25519 3
/*
 * A token key, in the PKCS#11 module at module_path that this process has
 * already loaded and initialized (C never initializes or finalizes it). C
 * signs with it once given a session (shmkey_server_token_session).
 */
int shmkey_signer_add_token(struct shmkey_signer *g, const uint8_t *key_id,
                            const char *module_path, uint32_t type, uint32_t sig_len,
                            int is_default, uint64_t *key_row);
/* The session and key object (CK_SESSION_HANDLE, CK_OBJECT_HANDLE) the
 * served signer's token key key_id is to use from now; session 0: none
 * (Python signs). SHMKEY_ENOKEY if it has no such token key. */
int shmkey_server_token_session(struct shmkey_server *s, const uint8_t *key_id,
                                uint64_t session, uint64_t object);
/* The DigestInfo prefix (RFC 8017 9.2) that CKM_RSA_PKCS signs before a
 * digest of hash (SHMKEY_HASH_SHA256/384/512): the one copy, Python's too. */
int shmkey_digest_info(uint32_t hash, const uint8_t **prefix, uint32_t *len);
void shmkey_signer_free(struct shmkey_signer *g);
/* Serve with g from the next request on (NULL: none); the server owns g then. */
void shmkey_server_use_signer(struct shmkey_server *s, struct shmkey_signer *g);
/* Count w's connection's requests in client_row (its first request came to Python). */
int shmkey_server_count_client(struct shmkey_server *s, struct shmkey_work *w,
                               uint64_t *client_row);

/* ---- shared helpers -------------------------------------------------- */
const char *shmkey_version(void);       /* shmkey/_version.py's, compiled in */
const char *shmkey_strerror(int status);
size_t shmkey_ring_size(uint32_t nslots, uint32_t slot_size);
uint32_t shmkey_slot_stride(uint32_t slot_size);
int shmkey_harden_process(void);
int shmkey_lock_memory(int resident_only);
int shmkey_die_with_parent(int sig, int expected_parent);

/* ---- oracle names and where their objects live (common.c) -------------- */
#define SHMKEY_NAME_MAX 64              /* longest oracle name */
int shmkey_check_name(const char *name);
int shmkey_ring_id(const char *name, char *out, uint32_t cap);
int shmkey_runtime_dir(const char *configured, int create, char *out, uint32_t cap,
                       char *why, uint32_t whylen);
int shmkey_socket_path(const char *dir, const char *name, char *out, uint32_t cap);
int shmkey_find_socket(const char *configured, const char *name, char *out, uint32_t cap,
                       char *why, uint32_t whylen);

/* ---- the sandbox of a network-facing process (sandbox.c; the Python
 * extension only, not the OpenSSL module) ------------------------------- */
/* Socket families it may still create: stream sockets only (TCP, Unix). */
#define SHMKEY_SANDBOX_UNIX 1
#define SHMKEY_SANDBOX_INET 2
#define SHMKEY_SANDBOX_INET6 4
/* What shmkey_sandbox_confine and _seal applied, in *applied. */
#define SHMKEY_SANDBOX_CHROOT 1        /* root is the given directory, cwd / */
#define SHMKEY_SANDBOX_USER 2          /* setgroups, setresgid, setresuid */
#define SHMKEY_SANDBOX_SECCOMP 4       /* the allow-list filter (always, once sealed) */
#define SHMKEY_SANDBOX_LOGGED 8        /* a denied call returns EPERM and is logged once */
#define SHMKEY_SANDBOX_PORTS 16        /* Landlock: TCP connect to tcp_port only, no bind */
#define SHMKEY_SANDBOX_SCOPED 32       /* Landlock: no abstract sockets or signals outside */
/*
 * Confine the calling process for good, in two calls. The first, while it
 * has one thread: chroot(root) and chdir("/") (root NULL or "": stay),
 * every capability dropped (bounding, ambient, permitted, effective,
 * inheritable), groups {gid} and gid, uid (-1: unchanged), NO_NEW_PRIVS,
 * DUMPABLE 0, RLIMIT_CORE 0, Landlock (TCP connect only to tcp_port, -1:
 * any; where the kernel has it). Threads started after it inherit all of
 * that. The second: RLIMIT_NPROC 0 (no more processes or threads) and, in
 * every thread, a seccomp allow-list in which socket() makes only stream
 * sockets of families (SHMKEY_SANDBOX_*). prefix starts the line that
 * reports a denied call. On failure why says which step failed; the process
 * may be half-confined and must exit.
 */
int shmkey_sandbox_confine(const char *root, int64_t uid, int64_t gid, uint32_t families,
                           int32_t tcp_port, const char *prefix, uint32_t *applied,
                           char *why, uint32_t whylen);
int shmkey_sandbox_seal(uint32_t *applied, char *why, uint32_t whylen);

/* ---- OpenSSL 3 provider (provider.c), for shmkey.openssl ---------------- */
#define SHMKEY_KEYREF_VERSION 2         /* version of the key references written now;
                                           version 1 (no oracle uid) is still read */
int shmkey_openssl_same_libcrypto(const char *module_path, char *detail, uint32_t cap);
int shmkey_openssl_enable(char *detail, uint32_t cap);
int shmkey_openssl_last_error(char *buf, uint32_t cap);
int shmkey_openssl_set_deadline(uint64_t deadline_ns);
const char *shmkey_openssl_version(void);
int shmkey_openssl_module_version(const char *path, char *out, uint32_t cap);
