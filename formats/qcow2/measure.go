package qcow2

import (
	"fmt"
	"math/bits"
)

// FullyAllocatedSize is the file size of a qcow2 image of virtual size
// size whose every cluster is allocated: data, L2 and L1 tables, header,
// and the refcount table and blocks that count all of those and
// themselves. It is qemu's formula, so `image measure` prints what
// `qemu-img measure` prints.
func FullyAllocatedSize(size, clusterSize int64, refcountBits int) (int64, error) {
	if clusterSize < 512 || clusterSize > 2<<20 || clusterSize&(clusterSize-1) != 0 {
		return 0, fmt.Errorf("qcow2: cluster size %d must be a power of two from 512 to 2M", clusterSize)
	}
	if refcountBits < 1 || refcountBits > 64 || refcountBits&(refcountBits-1) != 0 {
		return 0, fmt.Errorf("qcow2: refcount bits %d (want a power of two up to 64)", refcountBits)
	}
	roundUp := func(n, m int64) int64 { return (n + m - 1) / m * m }
	data := roundUp(size, clusterSize)
	meta := clusterSize // header
	// L2 tables, whole tables only; then the L1 table, whole clusters.
	l2e := roundUp(data/clusterSize, clusterSize/8)
	meta += l2e * 8
	meta += roundUp(l2e*8/clusterSize, clusterSize/8) * 8
	// Refcount blocks and table: grow both until they also count
	// themselves.
	clusters := (meta + data) / clusterSize
	perBlock := clusterSize * 8 >> bits.TrailingZeros(uint(refcountBits))
	perTable := clusterSize / 8
	var table, blocks, n int64
	for {
		last := n
		blocks = (clusters + table + blocks + perBlock - 1) / perBlock
		table = (blocks + perTable - 1) / perTable
		n = clusters + blocks + table
		if n == last {
			break
		}
	}
	return meta + (blocks+table)*clusterSize + data, nil
}
