/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * A freestanding C guest for mkvisor, on nothing but the generated ABI header
 * (vmcall-proto/include/mkvisor.h). It plays `ping` to the built-in `pong` guest at the
 * other end of its first channel: it sends `n` messages (argument `n`, default 10) and
 * checks every reply word for word; `pong` checks every message the same way. Exit status
 * 0 when all replies were right, 1 on a wrong reply, 2 on a damaged channel.
 */
#include <stdint.h>
#include "mkvisor.h"

/* The hypervisor enters here in 64-bit mode, RDI = boot info, interrupts off. */
__asm__(".section .text.entry, \"ax\"\n"
        ".global guest_start\n"
        "guest_start:\n"
        "  cli\n"
        "  xorl %ebp, %ebp\n"
        "  call c_main\n"
        "1: hlt\n"
        "  jmp 1b\n"
        ".text\n");

/* VMCALL on Intel VT-x, VMMCALL on AMD SVM (same ABI): decided once, in c_main, from the
 * CPUID vendor, before the first hypercall. */
static int use_vmmcall;

static void pick_hypercall_instruction(void) {
    uint32_t a = 0, b, c, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "=c"(c), "=d"(d));
    /* "AuthenticAMD" in EBX, EDX, ECX. */
    use_vmmcall = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;
}

static int64_t hypercall(uint64_t nr, uint64_t a0, uint64_t a1) {
    uint64_t ret;
    register uint64_t r10 __asm__("r10") = 0;
    if (use_vmmcall)
        __asm__ volatile("vmmcall"
                         : "=a"(ret)
                         : "a"(nr), "D"(a0), "S"(a1), "d"(0ULL), "r"(r10)
                         : "memory");
    else
        __asm__ volatile("vmcall"
                         : "=a"(ret)
                         : "a"(nr), "D"(a0), "S"(a1), "d"(0ULL), "r"(r10)
                         : "memory");
    return (int64_t)ret;
}

/* ---- console: one line at a time ---- */
static char line[MKV_CONSOLE_MAX];
static uint64_t line_len;

static void put(const char *s) {
    while (*s && line_len < sizeof line - 1)
        line[line_len++] = *s++;
}

static void put_u64(uint64_t v) {
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        put((char[]){digits[--n], 0});
}

static void put_fixed(const uint8_t *s, uint64_t max) {
    for (uint64_t i = 0; i < max && s[i]; i++)
        put((char[]){(char)s[i], 0});
}

static void flush(void) {
    line[line_len++] = '\n';
    hypercall(MKV_HYPERCALL_CONSOLE_WRITE, (uint64_t)line, line_len);
    line_len = 0;
}

static _Noreturn void leave(uint64_t status) {
    hypercall(MKV_HYPERCALL_EXIT, status, 0);
    for (;;)
        __asm__ volatile("hlt");
}

/* ---- the channel ring (vmcall-proto channel.rs: layout and memory ordering) ----
 * Epoch 0 only: this guest does not follow a peer that restarts (a new epoch's words carry
 * its tag in their top 16 bits, and the status page at MKV_STATUS_GPA says when). */
struct ring {
    MKV_ProducerLine *producer;
    MKV_ConsumerLine *consumer;
    MKV_Slot *slots;
    uint64_t n, next, acked;
};

static struct ring ring_at(uint64_t gpa, uint32_t slots) {
    struct ring r = {(MKV_ProducerLine *)gpa, (MKV_ConsumerLine *)(gpa + 64),
                     (MKV_Slot *)(gpa + MKV_HEADER_BYTES), slots, 0, 0};
    return r;
}

/* 0 sent, 1 full, -1 the consumer's count is impossible. */
static int try_send(struct ring *r, const uint64_t m[MKV_WORDS]) {
    if (r->next - r->acked >= r->n) {
        uint64_t got = __atomic_load_n(&r->consumer->received, __ATOMIC_ACQUIRE);
        if (got > r->next || got < r->acked)
            return -1;
        r->acked = got;
        if (r->next - got >= r->n)
            return 1;
    }
    MKV_Slot *s = &r->slots[r->next % r->n];
    for (int w = 0; w < MKV_WORDS; w++)
        __atomic_store_n(&s->data[w], m[w], __ATOMIC_RELAXED);
    __atomic_store_n(&s->control, r->next + 1, __ATOMIC_RELEASE);
    r->next++;
    __atomic_store_n(&r->producer->sent, r->next, __ATOMIC_RELAXED);
    return 0;
}

/* 1 received, 0 nothing yet, -1 corrupt or torn slot. */
static int try_recv(struct ring *r, uint64_t m[MKV_WORDS]) {
    MKV_Slot *s = &r->slots[r->next % r->n];
    uint64_t expected = r->next + 1;
    uint64_t c = __atomic_load_n(&s->control, __ATOMIC_ACQUIRE);
    if (c != expected) {
        uint64_t empty = r->next >= r->n ? expected - r->n : 0;
        return c == empty ? 0 : -1;
    }
    for (int w = 0; w < MKV_WORDS; w++)
        m[w] = __atomic_load_n(&s->data[w], __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&s->control, __ATOMIC_RELAXED) != c)
        return -1;
    r->next++;
    __atomic_store_n(&r->consumer->received, r->next, __ATOMIC_RELEASE);
    return 1;
}

/* The message `seq` from `origin` of the built-in channel workloads
 * (vmcall_proto::channel::message). */
static void message(uint64_t seq, uint64_t origin, uint64_t m[MKV_WORDS]) {
    m[0] = seq;
    m[1] = origin;
    for (int j = 2; j < MKV_WORDS; j++) {
        uint64_t x = (seq ^ origin << 48) * 0x9e3779b97f4a7c15ULL;
        unsigned k = (unsigned)(j * 7);
        m[j] = x << k | x >> (64 - k);
    }
}

/* `key=value` in the boot-info arguments, as a number. */
static uint64_t arg(const MKV_BootInfo *bi, const char *key, uint64_t dflt) {
    const char *a = (const char *)bi->args;
    for (uint64_t i = 0; i < sizeof bi->args && a[i]; i++) {
        if (i > 0 && a[i - 1] != ' ')
            continue;
        uint64_t k = 0;
        while (key[k] && i + k < sizeof bi->args && a[i + k] == key[k])
            k++;
        if (key[k] || i + k >= sizeof bi->args || a[i + k] != '=')
            continue;
        uint64_t v = 0;
        for (uint64_t j = i + k + 1; j < sizeof bi->args && a[j] >= '0' && a[j] <= '9'; j++)
            v = v * 10 + (uint64_t)(a[j] - '0');
        return v;
    }
    return dflt;
}

/* The boot page tables map the partition only; the channel windows (2 GiB to 3 GiB) get
 * a page directory of their own, identity-mapped with 2-MiB pages. */
static uint64_t channel_pd[512] __attribute__((aligned(4096)));

static void map_channel_windows(void) {
    for (uint64_t j = 0; j < 512; j++)
        channel_pd[j] = (MKV_CHANNEL_WINDOW_GPA + (j << 21)) | 0x83; /* present, RW, 2M */
    uint64_t *pdpt = (uint64_t *)MKV_BOOT_PDPT_GPA;
    pdpt[MKV_CHANNEL_WINDOW_GPA >> 30] = (uint64_t)channel_pd | 0x3;
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

void c_main(const MKV_BootInfo *bi) {
    pick_hypercall_instruction();
    if (bi->magic != MKV_BOOT_INFO_MAGIC || bi->version != MKV_BOOT_INFO_VERSION)
        leave(0xb0);
    put("hello from C: ");
    put_fixed(bi->name, sizeof bi->name);
    put(" (guest ");
    put_u64(bi->guest_id);
    put(") on core ");
    put_u64(bi->core);
    flush();
    if (bi->channel_count == 0) {
        put("ERROR no channel");
        flush();
        leave(1);
    }
    map_channel_windows();
    const MKV_ChannelDesc *d = &bi->channels[0];
    struct ring tx = ring_at(d->tx_gpa, d->slots), rx = ring_at(d->rx_gpa, d->slots);
    uint64_t n = arg(bi, "n", 10), m[MKV_WORDS], want[MKV_WORDS];
    for (uint64_t i = 0; i < n; i++) {
        message(i, 0, m);
        int s;
        while ((s = try_send(&tx, m)) == 1)
            __asm__ volatile("pause");
        int got;
        while ((got = try_recv(&rx, m)) == 0)
            __asm__ volatile("pause");
        if (s < 0 || got < 0) {
            put("ERROR channel damaged at message ");
            put_u64(i);
            flush();
            leave(2);
        }
        message(i, 1, want);
        for (int w = 0; w < MKV_WORDS; w++) {
            if (m[w] != want[w]) {
                put("ERROR reply ");
                put_u64(i);
                put(" wrong in word ");
                put_u64((uint64_t)w);
                flush();
                leave(1);
            }
        }
    }
    put("C guest: ");
    put_u64(n);
    put(" messages exchanged over ");
    put_fixed(d->name, sizeof d->name);
    put(", every reply checked");
    flush();
    leave(0);
}
