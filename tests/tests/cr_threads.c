/* A multi-threaded target for tests/tests/cr_threads.rs, built with gcc by the test.
 *
 * NWORKERS workers each increment their own counter and a shared one under one mutex
 * (so that, the mutex held, shared == the sum of the counters), sleeping now and then
 * (relative nanosleep); each checks on every round that its TLS (a __thread id and
 * pthread_self()) and its signal mask are its own, and counts the SIGUSR2 that
 * pthread_kill sends it. A spinner keeps a count in xmm15 with no call in its loop
 * (its XSAVE area must come back), a sleeper sleeps 20 ms at a time, and a waiter
 * waits on a condition variable. Commands on stdin, one line each, one reply line:
 *   hold     lock the mutex and keep it; print the counters
 *   peek     print the counters without locking
 *   release  unlock the mutex held by `hold`
 *   snap     lock, print the counters and check shared == sum, unlock
 *   kill     pthread_kill(SIGUSR2) every worker, wait until each has counted it
 *   tids     print the kernel tid every thread reads with gettid() now
 *   usr1     pthread_kill(SIGUSR1) worker 1, which blocks it: it stays pending there
 *   churns   print how many short-lived threads the churner created and joined
 *   exit     wake the waiter, stop and join everyone, print the results, exit 42
 * With the argument `churn`, a churner thread creates and joins short-lived threads in
 * a loop, so that checkpoints catch threads being born and dying. With `leaderexit`,
 * the main thread starts one thread, which prints `ready` and sleeps, and calls
 * pthread_exit: a process whose thread-group leader has exited.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NWORKERS 4

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t cv_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int go;
static volatile int stop;
static unsigned long counters[NWORKERS];
static unsigned long shared;
static pthread_t selves[NWORKERS];
static volatile unsigned long spins, sleeps;
static volatile int usr2_seen[NWORKERS];
static volatile long tids_now[NWORKERS + 4];
static volatile int want_tids;
static volatile unsigned long churns;
static __thread int my_id;
static __thread int my_usr2;

static void on_usr2(int sig) {
    (void)sig;
    my_usr2++;
    usr2_seen[my_id - 1] = my_usr2;
}

/* Odd workers block SIGUSR1 (a per-thread mask that must come back). */
static int mask_ok(int i) {
    sigset_t set;
    pthread_sigmask(SIG_BLOCK, NULL, &set);
    return sigismember(&set, SIGUSR1) == (i % 2);
}

static void *worker(void *arg) {
    int i = (int)(long)arg;
    my_id = i + 1;
    if (i % 2) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR1);
        pthread_sigmask(SIG_BLOCK, &set, NULL);
    }
    unsigned long round = 0;
    while (!stop) {
        pthread_mutex_lock(&mu);
        counters[i]++;
        shared++;
        pthread_mutex_unlock(&mu);
        if (my_id != i + 1 || !pthread_equal(pthread_self(), selves[i]) || !mask_ok(i)) {
            fprintf(stderr, "worker %d: TLS, pthread_self or signal mask wrong\n", i);
            abort();
        }
        if (want_tids) tids_now[i] = syscall(SYS_gettid);
        if (++round % 64 == 0) usleep(200);
    }
    return (void *)(long)(my_id == i + 1 && mask_ok(i) ? 1 : 0);
}

static void *spinner(void *arg) {
    (void)arg;
    double one = 1.0, v;
    unsigned long n = 0;
    __asm__ volatile("xorpd %%xmm15, %%xmm15" ::: "xmm15");
    while (!stop) {
        __asm__ volatile("addsd %1, %%xmm15\n\tmovsd %%xmm15, %0" : "=x"(v) : "x"(one) : "xmm15");
        n++;
        if (v != (double)n) {
            fprintf(stderr, "spinner: xmm15 %f, count %lu\n", v, n);
            abort();
        }
        spins = n;
        if (want_tids) tids_now[NWORKERS] = syscall(SYS_gettid);
    }
    return (void *)n;
}

static void *sleeper(void *arg) {
    (void)arg;
    while (!stop) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0) {
            perror("sleeper: nanosleep");
            abort();
        }
        sleeps++;
        if (want_tids) tids_now[NWORKERS + 1] = syscall(SYS_gettid);
    }
    return NULL;
}

static void *waiter(void *arg) {
    (void)arg;
    pthread_mutex_lock(&cv_mu);
    while (!go) pthread_cond_wait(&cv, &cv_mu);
    pthread_mutex_unlock(&cv_mu);
    return (void *)7;
}

static void *short_lived(void *arg) { return arg; }

static void *churner(void *arg) {
    (void)arg;
    while (!stop) {
        pthread_t t;
        void *r;
        if (pthread_create(&t, NULL, short_lived, (void *)churns) != 0) abort();
        if (pthread_join(t, &r) != 0 || r != (void *)churns) abort();
        churns++;
    }
    return NULL;
}

static void *lonely(void *arg) {
    (void)arg;
    sleep(1); /* after the main thread is gone */
    printf("ready\n");
    for (;;) pause();
    return NULL;
}

static void print_counters(const char *what) {
    printf("%s shared=%lu", what, shared);
    unsigned long sum = 0;
    for (int i = 0; i < NWORKERS; i++) {
        printf(" c%d=%lu", i, counters[i]);
        sum += counters[i];
    }
    printf(" sum=%lu\n", sum);
}

int main(int argc, char **argv) {
    int churn = argc > 1 && !strcmp(argv[1], "churn");
    if (argc > 1 && !strcmp(argv[1], "leaderexit")) {
        pthread_t t;
        setvbuf(stdout, NULL, _IONBF, 0);
        pthread_create(&t, NULL, lonely, NULL);
        pthread_exit(NULL);
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr2;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR2, &sa, NULL);
    pthread_t workers[NWORKERS], spin_t, sleep_t, wait_t, churn_t;
    pthread_mutex_lock(&mu);
    for (long i = 0; i < NWORKERS; i++) {
        pthread_create(&workers[i], NULL, worker, (void *)i);
        selves[i] = workers[i];
    }
    pthread_mutex_unlock(&mu);
    pthread_create(&spin_t, NULL, spinner, NULL);
    pthread_create(&sleep_t, NULL, sleeper, NULL);
    pthread_create(&wait_t, NULL, waiter, NULL);
    if (churn) pthread_create(&churn_t, NULL, churner, NULL);
    printf("ready pid=%d\n", getpid());
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (!strcmp(line, "hold")) {
            pthread_mutex_lock(&mu);
            print_counters("held");
        } else if (!strcmp(line, "peek")) {
            print_counters("peek");
        } else if (!strcmp(line, "release")) {
            pthread_mutex_unlock(&mu);
            printf("released\n");
        } else if (!strcmp(line, "snap")) {
            pthread_mutex_lock(&mu);
            print_counters("snap");
            pthread_mutex_unlock(&mu);
            printf("spins=%lu sleeps=%lu\n", spins, sleeps);
        } else if (!strcmp(line, "kill")) {
            int before[NWORKERS];
            for (int i = 0; i < NWORKERS; i++) before[i] = usr2_seen[i];
            for (int i = 0; i < NWORKERS; i++) {
                int err = pthread_kill(workers[i], SIGUSR2);
                if (err) {
                    printf("pthread_kill %d: %s\n", i, strerror(err));
                    goto next;
                }
            }
            for (int i = 0; i < NWORKERS; i++)
                while (usr2_seen[i] == before[i]) usleep(100);
            printf("killed");
            for (int i = 0; i < NWORKERS; i++) printf(" u%d=%d", i, usr2_seen[i]);
            printf("\n");
        } else if (!strcmp(line, "tids")) {
            for (int i = 0; i < NWORKERS + 2; i++) tids_now[i] = 0;
            want_tids = 1;
            for (int i = 0; i < NWORKERS + 2; i++)
                while (!tids_now[i]) usleep(100);
            want_tids = 0;
            printf("tids main=%ld", (long)syscall(SYS_gettid));
            for (int i = 0; i < NWORKERS + 2; i++) printf(" %ld", tids_now[i]);
            printf("\n");
        } else if (!strcmp(line, "usr1")) {
            int err = pthread_kill(workers[1], SIGUSR1);
            printf("usr1 %s\n", err ? strerror(err) : "sent");
        } else if (!strcmp(line, "churns")) {
            printf("churns=%lu\n", churns);
        } else if (!strcmp(line, "exit")) {
            pthread_mutex_lock(&cv_mu);
            go = 1;
            pthread_cond_broadcast(&cv);
            pthread_mutex_unlock(&cv_mu);
            stop = 1;
            int ok = 0;
            for (int i = 0; i < NWORKERS; i++) {
                void *r;
                if (pthread_join(workers[i], &r) == 0 && r == (void *)1) ok++;
            }
            void *spun, *waited;
            pthread_join(spin_t, &spun);
            pthread_join(sleep_t, NULL);
            pthread_join(wait_t, &waited);
            if (churn) pthread_join(churn_t, NULL);
            printf("joined ok=%d spins_ok=%d waiter=%ld shared=%lu sum_ok=%d\n", ok,
                   (unsigned long)spun == spins, (long)waited, shared,
                   shared == counters[0] + counters[1] + counters[2] + counters[3]);
            exit(42);
        } else {
            printf("unknown %s\n", line);
        }
    next:;
    }
    return 1;
}
