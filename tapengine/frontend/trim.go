package frontend

// Trim gives back the memory of the data pages (and indirect pages) of
// every tag not in flight, so an idle disk stops holding what a burst of
// big requests touched: a page of the grant table, once touched, stays
// resident in the memfd and counts in the RSS of both the daemon and the
// worker until it is punched out. Up to PageBudget pages (16 MiB) per disk.
//
// Safe to call at any time from any goroutine, while calls are in flight:
// it takes free tags out of the free list one at a time, punches the
// tag's pages and puts it back, until it meets a tag it already punched
// or the list is empty; tags in flight are left alone. One tag at a time,
// so a call that needs a tag meanwhile waits for one tag's punch (129
// pages: about 0.2 ms), not for the whole table's (about 6 ms). A punched
// page reads as zeros until the next request fills it, which no request
// relies on: reads are filled by the backend, writes by the frontend.
//
// Trim after Close returns the close error.
func (f *Frontend) Trim() error {
	f.life.RLock()
	defer f.life.RUnlock()
	f.mu.Lock()
	closed, closeErr := f.closed, f.closeErr
	f.mu.Unlock()
	if closed {
		return closeErr
	}
	indPages := f.indirectPages()
	seen := make([]bool, len(f.tags))
	for range f.tags {
		var id uint16
		select {
		case id = <-f.free:
		default:
			return nil
		}
		if seen[id] {
			// The free list came round: every tag it held is done.
			f.release(id)
			return nil
		}
		seen[id] = true
		err := f.punchTag(&f.tags[id], indPages)
		f.release(id)
		if err != nil {
			return err
		}
	}
	return nil
}

// punchTag punches one free tag's data pages and indirect pages: one
// range when they are consecutive, as the grant table's bump allocator
// lays them out.
func (f *Frontend) punchTag(t *tag, indPages int) error {
	if indPages > 0 && t.ind == t.first+uint32(f.segs) {
		return f.gt.Punch(t.first, f.segs+indPages)
	}
	if err := f.gt.Punch(t.first, f.segs); err != nil {
		return err
	}
	if indPages > 0 {
		return f.gt.Punch(t.ind, indPages)
	}
	return nil
}
