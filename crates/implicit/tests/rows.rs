//! Row subsets of a batch and the block operator assembled from pieces.

use anyhow::Result;
use candle_core::{Device, Tensor};
use savae_implicit::{BatchedOperator, RowBlocks, Rows, RowsOf};

/// Row b of `v` times `scale[b]` (a block-diagonal operator on `[r, n]`), counting the
/// rows it is applied to.
struct Scale {
    scale: Vec<f64>,
    applied: std::rc::Rc<std::cell::Cell<usize>>,
}

impl BatchedOperator for Scale {
    fn apply(&self, v: &Tensor) -> Result<Tensor> {
        assert_eq!(
            v.dim(0)?,
            self.scale.len(),
            "applied to the wrong number of rows"
        );
        self.applied.set(self.applied.get() + self.scale.len());
        let c = Tensor::from_vec(self.scale.clone(), (self.scale.len(), 1), v.device())?;
        Ok(v.broadcast_mul(&c)?)
    }
}

fn counter() -> std::rc::Rc<std::cell::Cell<usize>> {
    std::rc::Rc::new(std::cell::Cell::new(0))
}

/// A [`Scale`] by `scale`, counting its rows applied in `applied`.
fn scaled(scale: &[f64], applied: &std::rc::Rc<std::cell::Cell<usize>>) -> Box<Scale> {
    Box::new(Scale {
        scale: scale.to_vec(),
        applied: applied.clone(),
    })
}

/// The blocks of `rows` applied to `v`, as rows of numbers.
fn applied(blocks: &RowBlocks, rows: &Rows, v: &Tensor) -> Vec<Vec<f64>> {
    blocks
        .on(rows)
        .unwrap()
        .apply(v)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
}

#[test]
fn gather_put_and_scatter_move_the_named_rows_only() {
    let dev = Device::Cpu;
    let full = Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], &dev).unwrap();
    let rows = Rows::where_true(&[false, true, false, true], &dev).unwrap();
    assert_eq!(rows.rows(), &[1, 3]);
    let part = rows.gather(&full).unwrap();
    assert_eq!(
        part.to_vec2::<f64>().unwrap(),
        vec![vec![3.0, 4.0], vec![7.0, 8.0]]
    );
    let new = Tensor::new(&[[-1.0f64, -2.0], [-3.0, -4.0]], &dev).unwrap();
    assert_eq!(
        rows.put(&full, &new).unwrap().to_vec2::<f64>().unwrap(),
        vec![
            vec![1.0, 2.0],
            vec![-1.0, -2.0],
            vec![5.0, 6.0],
            vec![-3.0, -4.0]
        ]
    );
    // 1-D tensors (per-example values) too.
    let vals = Tensor::new(&[1.0f64, 2.0, 3.0, 4.0], &dev).unwrap();
    let newv = Tensor::new(&[9.0f64, 8.0], &dev).unwrap();
    assert_eq!(
        rows.put(&vals, &newv).unwrap().to_vec1::<f64>().unwrap(),
        vec![1.0, 9.0, 3.0, 8.0]
    );
    assert_eq!(
        rows.scatter(&new).unwrap().to_vec2::<f64>().unwrap(),
        vec![
            vec![0.0, 0.0],
            vec![-1.0, -2.0],
            vec![0.0, 0.0],
            vec![-3.0, -4.0]
        ]
    );
    let sub = rows.subset(&[1]).unwrap();
    assert_eq!(sub.rows(), &[3]);
    let all = Rows::all(4, &dev);
    assert!(all.is_all() && all.index().is_none());
    assert_eq!(
        all.put(&full, &full).unwrap().to_vec2::<f64>().unwrap(),
        full.to_vec2::<f64>().unwrap()
    );
    assert!(Rows::of(vec![2, 1], 4, &dev).is_err(), "rows out of order");
    assert!(
        Rows::of(vec![1, 4], 4, &dev).is_err(),
        "a row past the batch"
    );
}

#[test]
fn row_blocks_apply_each_rows_latest_block_and_only_the_pieces_that_own_rows() {
    let dev = Device::Cpu;
    let v = Tensor::new(&[[1.0f64, 1.0], [1.0, 2.0], [1.0, 3.0], [1.0, 4.0]], &dev).unwrap();
    let mut blocks = RowBlocks::new(4);
    // The whole batch first (scales 1..4), then rows 1 and 3 again (scales 10, 30), of
    // which only row 3's is taken, then row 0 (scale 100).
    let (c0, c1, c2) = (counter(), counter(), counter());
    let all = Rows::all(4, &dev);
    blocks.cover(&all, scaled(&[1.0, 2.0, 3.0, 4.0], &c0), &[0, 1, 2, 3]);
    let r13 = Rows::of(vec![1, 3], 4, &dev).unwrap();
    blocks.cover(&r13, scaled(&[10.0, 30.0], &c1), &[1]);
    let r0 = Rows::of(vec![0], 4, &dev).unwrap();
    blocks.cover(&r0, scaled(&[100.0], &c2), &[0]);
    assert_eq!(
        applied(&blocks, &all, &v),
        vec![
            vec![100.0, 100.0],
            vec![2.0, 4.0],
            vec![3.0, 9.0],
            vec![30.0, 120.0]
        ]
    );
    // Rows 2 and 3 only: the first piece (row 2) and the second (row 3); not the third.
    let (a0, a1, a2) = (c0.get(), c1.get(), c2.get());
    let r23 = Rows::of(vec![2, 3], 4, &dev).unwrap();
    assert_eq!(
        applied(&blocks, &r23, &r23.gather(&v).unwrap()),
        vec![vec![3.0, 9.0], vec![30.0, 120.0]]
    );
    assert_eq!((c0.get() - a0, c1.get() - a1, c2.get() - a2), (4, 2, 0));
    // A row no piece covers is an error, not a zero block.
    let mut empty = RowBlocks::new(2);
    empty.cover(
        &Rows::of(vec![0], 2, &dev).unwrap(),
        scaled(&[1.0], &counter()),
        &[0],
    );
    assert!(empty.on(&Rows::all(2, &dev)).is_err());
}

#[test]
fn rows_of_a_whole_batch_operator_is_its_blocks() {
    let dev = Device::Cpu;
    let op = RowsOf {
        op: scaled(&[1.0, 2.0, 3.0], &counter()),
        rows: Rows::of(vec![0, 2], 3, &dev).unwrap(),
    };
    let v = Tensor::new(&[[1.0f64], [5.0]], &dev).unwrap();
    assert_eq!(
        op.apply(&v).unwrap().to_vec2::<f64>().unwrap(),
        vec![vec![1.0], vec![15.0]]
    );
}

#[test]
fn row_blocks_drop_a_piece_once_no_retained_row_owns_it() {
    let dev = Device::Cpu;
    let mut blocks = RowBlocks::new(4);
    // Piece 0 covers every row, piece 1 takes rows 2 and 3 from it.
    let (c0, c1) = (counter(), counter());
    blocks.cover(
        &Rows::all(4, &dev),
        scaled(&[1.0, 2.0, 3.0, 4.0], &c0),
        &[0, 1, 2, 3],
    );
    blocks.cover(
        &Rows::of(vec![2, 3], 4, &dev).unwrap(),
        scaled(&[30.0, 40.0], &c1),
        &[0, 1],
    );
    // Each live piece holds a clone of its counter.
    assert_eq!(
        (
            std::rc::Rc::strong_count(&c0),
            std::rc::Rc::strong_count(&c1)
        ),
        (2, 2)
    );
    // Row 1 released: piece 0 still owns row 0.
    blocks.retain(&[true, false, true, true]).unwrap();
    assert_eq!(std::rc::Rc::strong_count(&c0), 2);
    let r3 = Rows::of(vec![3], 4, &dev).unwrap();
    let v = Tensor::new(&[[1.0f64]], &dev).unwrap();
    assert_eq!(applied(&blocks, &r3, &v), vec![vec![40.0]]);
    // Row 0 too: piece 0 owns nothing and is dropped; row 0 has no block now.
    blocks.retain(&[false, false, true, true]).unwrap();
    assert_eq!(
        (
            std::rc::Rc::strong_count(&c0),
            std::rc::Rc::strong_count(&c1)
        ),
        (1, 2)
    );
    assert!(blocks.on(&Rows::of(vec![0], 4, &dev).unwrap()).is_err());
    // Nothing kept: every piece dropped. A flag per row of the batch, or an error.
    assert!(blocks.retain(&[false; 3]).is_err());
    blocks.retain(&[false; 4]).unwrap();
    assert_eq!(std::rc::Rc::strong_count(&c1), 1);
    // clear() is retain of nothing, and the blocks take new pieces after it.
    blocks.cover(
        &Rows::all(4, &dev),
        scaled(&[1.0, 2.0, 3.0, 4.0], &c0),
        &[0, 1, 2, 3],
    );
    assert_eq!(std::rc::Rc::strong_count(&c0), 2);
    blocks.clear();
    assert_eq!(std::rc::Rc::strong_count(&c0), 1);
    assert!(blocks.on(&r3).is_err());
    blocks.cover(&r3, scaled(&[7.0], &c1), &[0]);
    assert_eq!(applied(&blocks, &r3, &v), vec![vec![7.0]]);
}
