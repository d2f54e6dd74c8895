package xen

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/blktap-go/blktap/tapengine/ring"
)

// FuzzTransport feeds guest-controlled values (the xenstore parameters
// and the grant refs requests name) and guest actions to a transport over
// the fake device. Input:
//
//	+-------+----------------+---------+-------+-----------------------+
//	| nrefs | ref u16 x n    | port u8 | flags | op, arg u8 ...        |
//	+-------+----------------+---------+-------+-----------------------+
//
// flags bit0 persistent, bits1-3 MaxPersistent, bits4-6 MaxTransient.
// Ops: 0-2 Page, 3 kick, 4 Ack, 5 Notify, 6 ReleasePages, 7 revoke, 8 a
// grant copy (fuzzCopy). Nothing may panic; every error carries a class; mappings stay within
// ring + MaxPersistent + MaxTransient; Close leaves nothing mapped or
// bound.
func FuzzTransport(f *testing.F) {
	f.Add([]byte{1, 0, 100, 7, 0x11, 0, 10, 0, 11, 4, 0, 5, 0})
	f.Add([]byte{2, 0, 100, 0, 101, 7, 0x23, 1, 10, 1, 10, 0, 12, 6, 0, 7, 0, 4, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		fx := newFakeXen(t, testDomid, 32)
		// Guest pages 0..15 granted as refs 100..115 (12.. read-only),
		// pages 16..31 as refs 10..25.
		for p := range 16 {
			fx.grant(uint32(100+p), p, p >= 12)
			fx.grant(uint32(10+p), 16+p, p%5 == 4)
		}
		next := func() byte {
			if len(data) == 0 {
				return 0
			}
			b := data[0]
			data = data[1:]
			return b
		}
		n := int(next()) % 33
		refs := make([]uint32, n)
		for i := range refs {
			refs[i] = uint32(binary.BigEndian.Uint16([]byte{next(), next()}))
		}
		port := uint32(next())
		flags := next()
		opts := Options{Domid: testDomid, RingRefs: refs, EventChannel: port,
			PersistentGrants: flags&1 != 0, MaxPersistent: int(flags>>1&7) + 1, MaxTransient: int(flags>>4&7) + 1}
		tr, err := Attach(fx.device(), opts)
		if err != nil {
			classed(t, err)
			if _, closed, _, _ := fx.state(); !closed || fx.liveMappings() != 0 {
				t.Fatalf("failed Attach leaked: closed %v, %d mapped", closed, fx.liveMappings())
			}
			return
		}
		x := tr.(*Transport)
		limit := n + opts.MaxPersistent + opts.MaxTransient
		for len(data) > 0 {
			op, arg := next()%9, next()
			switch op {
			case 0, 1, 2:
				p, err := x.Page(uint32(arg%128), op == 1)
				if err != nil {
					classed(t, err)
				} else if len(p) != pageSize {
					t.Fatalf("page of %d bytes", len(p))
				} else if op == 1 {
					// A read-only mapping handed out as writable
					// faults here.
					p[int(arg)*16]++
				}
			case 3:
				fx.kick()
			case 4:
				err = x.Ack()
			case 5:
				err = x.Notify()
			case 6:
				err = x.ReleasePages()
			case 7:
				fx.revoke(uint32(arg % 128))
			case 8:
				fuzzCopy(t, fx, x, arg, next)
			}
			if err != nil {
				t.Fatalf("op %d: %v", op, err)
			}
			if got := fx.liveMappings(); got > limit {
				t.Fatalf("%d pages mapped, limit %d", got, limit)
			}
		}
		if err := x.Close(); err != nil {
			t.Fatal(err)
		}
		if bound, closed, _, _ := fx.state(); bound || !closed || fx.liveMappings() != 0 {
			t.Fatalf("after Close: bound %v closed %v, %d mapped", bound, closed, fx.liveMappings())
		}
	})
}

func classed(t *testing.T, err error) {
	t.Helper()
	for _, c := range []error{ErrBadOptions, ErrNotGranted, ErrTooManyMappings, ErrClosed, errFake} {
		if errors.Is(err, c) {
			return
		}
	}
	t.Fatalf("error without a class: %v", err)
}

// fuzzCopy is a grant copy of up to four segments the input describes
// (any offset and length, so some are refused before the kernel): it
// either fails with a classed error or copies exactly the guest's bytes,
// and never maps a page.
func fuzzCopy(t *testing.T, fx *fakeXen, x *Transport, arg byte, next func() byte) {
	segs := make([]ring.CopySeg, arg%4+1)
	n := 0
	for i := range segs {
		segs[i] = ring.CopySeg{Ref: uint32(next() % 128), Off: uint16(next()) * 32, Len: uint16(next()) * 32}
		n += int(segs[i].Len)
	}
	buf := make([]byte, n)
	for i := range buf {
		buf[i] = byte(i)
	}
	live := fx.liveMappings()
	var err error
	if arg&4 != 0 {
		err = x.CopyOut(segs, buf)
	} else {
		err = x.CopyIn(segs, buf)
	}
	if fx.liveMappings() != live {
		t.Fatal("a grant copy changed the live mappings")
	}
	if err != nil {
		classed(t, err)
		return
	}
	fx.mu.Lock()
	defer fx.mu.Unlock()
	pages := map[int]bool{}
	for _, sg := range segs {
		pages[fx.grants[sg.Ref].page] = true
	}
	if len(pages) < len(segs) {
		return // a later segment may have overwritten an earlier one's page
	}
	for _, sg := range segs {
		g := fx.grants[sg.Ref]
		if !bytes.Equal(buf[:sg.Len], fx.guest[g.page*pageSize+int(sg.Off):][:sg.Len]) {
			t.Fatalf("segment %+v: buffer and guest page differ after the copy", sg)
		}
		buf = buf[sg.Len:]
	}
}
