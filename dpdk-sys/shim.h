/* Exported wrappers for DPDK's static-inline functions, which bindgen cannot bind. One call per
 * burst: per-packet helpers (mtod, lengths) are done in Rust on the mbuf fields. */
#ifndef RINGSWITCH_DPDK_SHIM_H
#define RINGSWITCH_DPDK_SHIM_H
#include <stdint.h>
struct rte_mbuf;
struct rte_mempool;

uint16_t rs_eth_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t rs_eth_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
int rs_pktmbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **pkts, unsigned n);
void rs_pktmbuf_free(struct rte_mbuf *m);
int rs_errno(void);
/* RTE_ETH_RSS_IP | _TCP | _UDP: function-like macros bindgen cannot evaluate. */
extern const uint64_t rs_rss_hf_ip_tcp_udp;
unsigned rs_lcore_id(void);
#endif
